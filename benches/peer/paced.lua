-- A paced soak load: random user IDs, each connection waits ~15 ms between requests
-- (32 connections give roughly 2 000 requests/s).
math.randomseed(os.time())
request = function()
  wrk.headers["X-User-Id"] = "user-" .. math.random(1, 1000000)
  return wrk.format(nil, "/api/items?x=1")
end
delay = function()
  return 15
end
