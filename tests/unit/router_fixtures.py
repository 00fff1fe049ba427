"""Shared by the router tests: a settable clock and prompts whose families share leading tokens."""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def tokens(num_tokens, family=0):
    """A prompt; prompts of one family share every leading token."""
    return [family * 100_000 + i for i in range(num_tokens)]
