"""Kinshasa's migrations, one file per revision, named <branch>_<number>_<what>.py."""
