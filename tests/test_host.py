"""moesim.measure.host: steal time from /proc/stat, on hand-written files."""

from pathlib import Path

from moesim.measure.host import CpuTimes, cpu_times, steal_fraction, steal_note, steal_since


def _stat(tmp_path: Path, name: str, line: str) -> Path:
    path = tmp_path / name
    path.write_text(line + "\ncpu0 1 2 3 4 5 6 7 8 0 0\n", encoding="ascii")
    return path


def test_cpu_times_sums_the_eight_time_fields_and_reads_steal(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path = _stat(tmp_path, "stat", "cpu  100 0 20 800 5 0 1 74 30 0")
    assert cpu_times(path) == CpuTimes(total=1000, steal=74)


def test_steal_fraction_is_the_stolen_share_of_the_span(tmp_path: Path) -> None:
    before = cpu_times(_stat(tmp_path, "a", "cpu  100 0 20 800 5 0 1 74 0 0"))
    after = cpu_times(_stat(tmp_path, "b", "cpu  250 0 40 1460 5 0 1 244 0 0"))
    # 1000 more jiffies, 170 of them stolen
    assert steal_fraction(before, after) == 0.17
    assert steal_note(0.17) == (
        "the hypervisor took 17% of this machine's CPU time (timings are noisy)"
    )


def test_unknown_or_idle_readings_say_nothing(tmp_path: Path) -> None:
    assert cpu_times(tmp_path / "missing") is None
    assert cpu_times(_stat(tmp_path, "bad", "intr 1 2 3")) is None
    same = CpuTimes(total=10, steal=1)
    assert steal_fraction(same, same) is None and steal_fraction(None, same) is None
    assert steal_note(None) == "" and steal_note(0.004) == ""


def test_steal_since_reads_the_machine_now() -> None:
    before = cpu_times()
    fraction = steal_since(before)
    # on Linux a fraction in [0, 1] (None when no jiffy passed); None without /proc/stat
    assert fraction is None or 0.0 <= fraction <= 1.0
    assert steal_since(None) is None
