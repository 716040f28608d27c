"""A finished command leaves at once, with its exit code, its output and its exit handlers' work."""

import subprocess
import sys

SCRIPT = """
import atexit, sys
from pipelines.fast_exit import exit_now
atexit.register(lambda: print("handler ran", flush=True))
print("output", end="")          # unflushed on purpose
print("to stderr", file=sys.stderr, end="")
exit_now({code})
"""


def test_exit_code_output_and_handlers_survive():
    for code, expected in (("3", 3), ("None", 0)):
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(code=code)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == expected
        assert done.stdout == "outputhandler ran\n" and done.stderr == "to stderr"


def test_a_running_non_daemon_thread_is_waited_for():
    script = ("import threading, time\nfrom pipelines.fast_exit import exit_now\n"
              "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()\n"
              "exit_now(0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "thread done\n"


def test_a_thread_pool_finishes_its_work_and_the_teardown_is_still_skipped():
    script = ("from concurrent.futures import ThreadPoolExecutor\nimport time\n"
              "from pipelines.fast_exit import exit_now\n"
              "class Torn:\n    def __del__(self): print('teardown', flush=True)\n"
              "kept = Torn()\n"
              "pool = ThreadPoolExecutor(1)\npool.submit(print, 'idle after this', flush=True).result()\n"
              "pool.submit(lambda: (time.sleep(0.3), print('task done', flush=True)))\n"
              "exit_now(0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "idle after this\ntask done\n", done.stderr
