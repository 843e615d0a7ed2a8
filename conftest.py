# The test bed's fixtures (control_plane, postgres, rabbitmq, smtp_sink) for every test in the repository.
pytest_plugins = ["emporium_testbed.pytest_plugin"]
