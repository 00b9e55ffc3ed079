"""End-to-end tests: the compose lab on a real docker engine (marker ``e2e``)."""
