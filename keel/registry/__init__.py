"""What exactly is served: file digests, lock files and the fingerprint derived from them."""
