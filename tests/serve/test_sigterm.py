"""``tml serve`` as a process: fresh weights, prints its URL, takes a session, and on
SIGTERM closes the socket (1001 going away) and exits 0."""

import asyncio
import os
import re
import signal
import subprocess
import sys

from tests.serve.client import Client


def test_tml_serve_stops_cleanly_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tml.cli", "serve", "serve.checkpoint=none", "serve.port=0",
                             "serve.warmup=false"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"open (http://127\.0\.0\.1:\d+/)", line):
                break
        else:
            raise AssertionError("tml serve printed no URL:\n" + "".join(lines))
        assert "untrained (fresh init, seed 0)" in "".join(lines)

        async def session():
            async with Client(m.group(1), seed=1) as c:
                assert c.hello["session"] == 0
                proc.send_signal(signal.SIGTERM)
                msg = await c.ws.receive(timeout=30)
                return msg.type.name, msg.data
        assert asyncio.run(session()) == ("CLOSE", 1001)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        assert "stopped after 0 ticks, 1 sessions" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
