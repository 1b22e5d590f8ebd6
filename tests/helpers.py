"""Reference implementations and toy problems shared by the tests."""
