"""A local sandbox of the platform: a stack's rendered configs run as processes on 127.0.0.1."""
