"""benchmarks/run.py's profile part, as far as it can be checked without a benchmark: how
perf's and strace's reports are read, and the tables they make. No timing asserted."""

from __future__ import annotations

from types import ModuleType

import pytest

from .test_run_h2 import load_run


@pytest.fixture(scope="module")
def run() -> ModuleType:
    return load_run()


PERF_REPORT = """\
# Samples: 20K of event 'cpu-clock'
#
# Overhead  Shared Object
# ........  ....................
#
    65.21%  libpython3.11.so.1.0
    25.07%  [kernel.kallsyms]
     3.70%  parser.cpython-311-x86_64-linux-gnu.so
     2.00%  libc.so.6
     1.25%  libc.so.6
     1.00%  libssl.so.3
     0.50%  libcrypto.so.3
     0.26%  select.cpython-311-x86_64-linux-gnu.so
     0.01%  [vdso]
"""

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.400000          20     20000           sendto
 30.00    0.300000          15     20010      9990 recvfrom
 20.00    0.200000          10     20000           epoll_ctl
 10.00    0.100000          16      6300           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    1.000000          15     66310      9990 total
"""


def test_perf_shares_are_grouped_by_what_the_objects_do(run: ModuleType) -> None:
    shares = run.group_shares(PERF_REPORT)
    assert shares == pytest.approx(
        {
            "the Python interpreter (our code, trio, the layers)": 0.6521,
            "the kernel (TCP over loopback, epoll, waking the peers)": 0.2507,
            "llhttp (httptools)": 0.037,
            "libc (malloc, memcpy)": 0.0325,  # two lines of one object add up
            "OpenSSL": 0.015,
            run.PROFILE_OTHER: 0.0027,  # select and the vDSO
        }
    )


def test_strace_counts_become_calls_a_request(run: ModuleType) -> None:
    calls = run.syscalls_per_request(STRACE_SUMMARY, 10000)
    assert calls == pytest.approx({"sendto": 2.0, "recvfrom": 2.001, "epoll_ctl": 2.0, "epoll_wait": 0.63})


def test_the_profile_tables_split_the_cpu_a_request(run: ModuleType) -> None:
    measured = run.ProfileMeasured(
        {
            "saturation (wrk -c32)": run.ProfileRun(100.0, run.group_shares(PERF_REPORT), {"sendto": 2.0}),
            "1,000 req/s over 4 connections": run.ProfileRun(
                200.0, {"the kernel (TCP over loopback, epoll, waking the peers)": 1.0}, {"sendto": 2.0, "poll": 0.001}
            ),
        }
    )
    cpu, syscalls = run.profile_tables(measured)
    interpreter = next(row for row in cpu.rows if row[0].startswith("the Python interpreter"))
    assert interpreter == ["the Python interpreter (our code, trio, the layers)", "65.2%", "0.0%", "65.2", "0.0"]
    assert cpu.rows[-1] == ["total", "100%", "100%", "100.0", "200.0"]
    assert [row[0] for row in syscalls.rows] == ["sendto", "total"]  # under 0.01 a request: left out
