# Your project's root conftest.py: the lab's pytest fixtures (lab_session, lab_images,
# lab_network, lab_certificates). Ryuk stays off; the session cleans up by label.
pytest_plugins = ["labkit.testing.plugin"]
