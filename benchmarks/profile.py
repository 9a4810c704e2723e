"""Profile the workers of one system while they run the benchmark pipeline.

``python -m benchmarks.profile --broker redis --system wc`` starts the
system's workers and records every worker process with py-spy while the
workers run a batch of runs. py-spy samples a process only while it holds the
GIL, so the profile shows CPU time, not waiting. The command then prints, for
each process, the functions that take the largest share of its samples. Raw
py-spy output stays in ``--folder``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import SMALL_PAYLOAD, Session, Settings, check_broker
from benchmarks.systems import LINEAR, SYSTEMS, Shape
from soak.brokers import descendants

#: Samples per second that py-spy takes of each process.
SAMPLING_RATE_HZ = 200

_LINE_NUMBER = re.compile(r":\d+\)")


#: Frames in at least this share of a process's samples are its start-up and
#: event loop, which every sample passes through, and are left out.
COMMON_FRAME_SHARE = 0.85


def summarise(path: Path, top: int, title: str) -> list[str]:
    """Return the ``top`` functions of a py-spy ``raw`` profile, by inclusive and by own share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return [f"{title} ({path.name}): no samples"]
    lines = [f"{title} ({path.name}): {total} samples", "  inclusive    own  function"]
    below_common = [
        (frame, count)
        for frame, count in inclusive.most_common()
        if count < COMMON_FRAME_SHARE * total
    ]
    for frame, count in below_common[:top]:
        lines.append(f"  {100 * count / total:8.1f}% {100 * own[frame] / total:5.1f}%  {frame}")
    lines.append("  by own share:")
    for frame, count in own.most_common(top):
        lines.append(f"  {'':9} {100 * count / total:5.1f}%  {frame}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description="Record the benchmark's workers with py-spy and list their hottest functions.",
    )
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis", help="broker (default %(default)s)")
    parser.add_argument("--system", choices=sorted(SYSTEMS), default="wc", help="system to profile (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3000, help="runs started while recording (default %(default)s)")
    parser.add_argument("--seconds", type=int, default=8, help="seconds py-spy records (default %(default)s)")
    parser.add_argument("--recipe-nodes", type=int, default=0, help="pad each recipe to this many nodes (default: no padding)")
    parser.add_argument("--payload-bytes", type=int, default=SMALL_PAYLOAD, help="padding of each payload, in characters (default %(default)s)")
    parser.add_argument("--top", type=int, default=40, help="functions listed per process, in each list (default %(default)s)")
    parser.add_argument("--redis-url", default=Settings.redis_url, help="Redis broker (default %(default)s)")
    parser.add_argument("--amqp-url", default=Settings.amqp_url, help="RabbitMQ broker (default %(default)s)")
    parser.add_argument("--sink-url", default=Settings.sink_url, help="Redis that receives finished runs (default %(default)s)")
    parser.add_argument("--folder", type=Path, help="folder for py-spy output and worker logs (default: a new temporary folder)")
    arguments = parser.parse_args(argv)

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed; install it with: pip install py-spy")
    folder = arguments.folder or Path(tempfile.mkdtemp(prefix="workflows-celery-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        redis_url=arguments.redis_url, amqp_url=arguments.amqp_url, sink_url=arguments.sink_url
    )
    system = SYSTEMS[arguments.system]
    if not system.supports(arguments.broker):
        parser.error(f"{system.label} ({arguments.system}) runs on RabbitMQ only: use --broker rabbitmq")
    check_broker(settings.sink_url, "--sink-url")
    check_broker(settings.broker_url(arguments.broker), f"--{'redis' if arguments.broker == 'redis' else 'amqp'}-url")
    shape = Shape(total_nodes=arguments.recipe_nodes) if arguments.recipe_nodes else LINEAR

    with Session(settings, system, arguments.broker, folder, settings.broker_url(arguments.broker)) as session:
        roots = session.workers.pids
        titles = {pid: "worker main process" for pid in roots}
        for root in roots:
            for child in descendants(root):
                titles[child] = "pool child or service process"
        pids = list(titles)
        recorders = [
            subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(arguments.seconds),
                 "--rate", str(SAMPLING_RATE_HZ), "--format", "raw", "--gil", "--nonblocking",
                 "--output", str(folder / f"{arguments.system}-{arguments.broker}-{pid}.txt")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for pid in pids
        ]
        seconds, _ = session.run_batch(arguments.runs, shape, arguments.payload_bytes)
        for recorder in recorders:
            recorder.wait()
    print(f"{arguments.runs} runs in {seconds:.1f} s ({arguments.runs / seconds:.0f} per second)")
    for pid, title in titles.items():
        path = folder / f"{arguments.system}-{arguments.broker}-{pid}.txt"
        if path.exists():
            print("\n".join(summarise(path, arguments.top, f"{title} {pid}")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
