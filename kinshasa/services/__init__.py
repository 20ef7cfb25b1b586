"""The service kit and the example domain services."""
