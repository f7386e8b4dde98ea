"""A module that takes a second to import (a stand-in for a heavy preload)."""

import time

time.sleep(1.0)
