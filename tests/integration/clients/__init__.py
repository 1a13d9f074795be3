"""Scripts that drive the guard with third-party clients, each in a process of its own."""
