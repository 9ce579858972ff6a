"""The run's configuration: the defaults (`defaults.get_config`, which every configs/*.py
starts from) and their resolution into typed settings (`settings.resolve`)."""
