"""Program sources the tests define (text, as a notebook cell would hold them)."""

INC = "def inc(x):\n    return x + 1\n"
WHOAMI = "import os\ndef whoami(*args, **kwargs):\n    return os.getpid()\n"
# ``marker``: a path the program creates as it starts, so a test knows it runs.
SLEEPY = (
    "import os, time\n"
    "def sleepy(seconds, tag=None, marker=None):\n"
    "    if marker:\n"
    "        open(marker, 'w').close()\n"
    "    time.sleep(seconds)\n"
    "    return (tag, os.getpid())\n"
)
BOOM = "def boom(msg='bad input'):\n    raise ValueError(msg)\n"
EXIT = "import os\ndef exit_now(code=3):\n    os._exit(code)\n"
SEGFAULT = "import ctypes\ndef segfault():\n    ctypes.string_at(0)\n"
HANG = (
    "import time\n"
    "def hang(marker=None):\n"
    "    if marker:\n"
    "        open(marker, 'w').close()\n"
    "    while True:\n"
    "        time.sleep(0.05)\n"
)
SPIN = "def spin():\n    while True:\n        pass\n"
