"""Test support: storage wrappers, the S3 (moto) fixtures, the fault proxy, harnesses."""
