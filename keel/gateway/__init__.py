"""The layer in front of the engines: API keys with scopes, limits and usage (more to come: routing,
failover, guardrail policies)."""
