"""metagrad's experiment suite. Run `python -m experiments --help`."""
