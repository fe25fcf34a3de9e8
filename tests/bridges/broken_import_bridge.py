"""A bridge script that fails at import (test_fork_start.py: the template cannot start)."""

raise ImportError("this bridge needs a package that is not installed: pip install nothing-here")
