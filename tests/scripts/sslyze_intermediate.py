#!/usr/bin/env python3
"""Checks a TLS server against Mozilla's "intermediate" configuration with sslyze.

usage: sslyze_intermediate.py HOST:PORT CA_FILE

A test server's certificate comes from a private CA, which no public trust store holds,
so sslyze's own "certificate_path_validation" check cannot pass. This script runs the same
scan and the same compliance checker as `sslyze --mozilla_config=intermediate`, requires
the chain to validate against CA_FILE instead, and fails on every other issue.
"""
import sys
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    Scanner,
    ScanCommandsExtraArguments,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)


def main() -> int:
    host, port = sys.argv[1].rsplit(":", 1)
    ca_file = Path(sys.argv[2])
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname=host, port=int(port)),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    result = next(iter(scanner.get_results()))
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        print(f"scan failed: {result.connectivity_error_trace}")
        return 1

    deployment = result.scan_result.certificate_info.result.certificate_deployments[0]
    custom = [r for r in deployment.path_validation_results if r.trust_store.path == ca_file]
    chain_ok = bool(custom) and custom[0].was_validation_successful
    print(f"certificate chain validates against {ca_file}: {chain_ok}")
    if custom and not chain_ok:
        print(f"  {custom[0].validation_error}")

    intermediate = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, intermediate)
        issues = {}
    except ServerNotCompliantWithTlsConfiguration as e:
        issues = dict(e.issues)
    public_trust_only = issues.pop("certificate_path_validation", None)
    if public_trust_only:
        print(f"ignored (private CA, checked above instead): {public_trust_only}")
    for name, issue in issues.items():
        print(f"NOT COMPLIANT: {name}: {issue}")
    if issues or not chain_ok:
        return 1
    print("compliant with Mozilla's intermediate configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
