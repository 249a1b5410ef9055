"""Model architectures. They know nothing about distribution."""
