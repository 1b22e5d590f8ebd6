"""metagrad's implementation; import from `metagrad`, not from here."""
