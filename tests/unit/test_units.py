import pytest

from gateway.units import format_memory, format_walltime, parse_memory, parse_walltime


@pytest.mark.parametrize("text, seconds", [
    ("01:30:00", 5400), ("90m", 5400), ("1h30m", 5400), ("2d", 172800), ("1-00:00:01", 86401),
    ("45s", 45), ("0:00:05", 5)])
def test_walltime_forms(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["90", "1.5h", "01:61:00", "abc", "", "-5m", "0s", "400d", "90 m", True])
def test_walltime_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="HH:MM:SS|positive|over a year|not a walltime"):
        parse_walltime(text)


@pytest.mark.parametrize("text, size", [("512M", 512 << 20), ("4G", 4 << 30), ("4GiB", 4 << 30),
                                        ("1.5T", int(1.5 * (1 << 40))), ("2048k", 2 << 20)])
def test_memory_forms(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["4", "4X", "G", "-1G", "100T", "1K", 4096, "4 G B"])
def test_memory_refused(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_formats_round_trip_slurm_style():
    assert format_walltime(5400) == "01:30:00"
    assert format_walltime(86401) == "1-00:00:01"
    assert format_memory(4 << 30) == "4G"
    assert format_memory(1536 << 20) == "1536M"
    assert parse_memory(format_memory(3 << 40)) == 3 << 40
