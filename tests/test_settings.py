import pytest

from pwriter.errors import UsageError
from pwriter.settings import ConfigError, load_settings, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 << 20),
        ("1M", 1 << 20),
        ("512KB", 512 << 10),
        ("512kb", 512 << 10),
        ("2 GiB", 2 << 30),
        ("65536", 65536),
        ("4096B", 4096),
        (8192, 8192),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4XB", "", "-1M", "1.5M", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.layout == "auto"
    assert settings.backend == "auto"
    assert settings.fsync is True
    assert settings.direct is False
    assert settings.stripe_size is None and settings.workers is None


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_STRIPE_SIZE", "8MiB")
    monkeypatch.setenv("PWRITER_LAYOUT", "sharded")
    monkeypatch.setenv("PWRITER_FSYNC", "false")
    monkeypatch.setenv("PWRITER_MEMORY_BUDGET", "64M")
    monkeypatch.setenv("PWRITER_WRITE_CALL_SIZE", "256KiB")
    settings = load_settings()
    assert (settings.stripe_size, settings.layout, settings.fsync, settings.memory_budget,
            settings.write_call_size) == (8 << 20, "sharded", False, 64 << 20, 256 << 10)


def test_explicit_values_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_WORKERS", "3")
    assert load_settings(workers=5).workers == 5
    assert load_settings(workers=None).workers == 3  # None means "not given"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"stripe_size": "4XB"}, "stripe_size"),
        ({"stripe_size": "1K"}, "stripe_size"),
        ({"layout": "diagonal"}, "layout"),
        ({"backend": "magic"}, "backend"),
        ({"workers": 0}, "workers"),
        ({"workers": "many"}, "workers"),
        ({"buffers_per_worker": 1}, "buffers_per_worker"),
        ({"max_delay": -1}, "max_delay"),
        ({"memory_budget": "1K"}, "memory_budget"),
        ({"write_call_size": "1K"}, "write_call_size"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert field in message
    assert "\n" not in message
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2


def test_invalid_environment_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PWRITER_QUEUE_DEPTH", "deep")
    with pytest.raises(ConfigError, match="queue_depth"):
        load_settings()


def test_environment_error_names_the_variable_and_unknown_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PWRITER_NOT_A_SETTING", "whatever")
    monkeypatch.setenv("pwriter_level", "2")  # names are not case-sensitive
    assert load_settings().level == 2
    monkeypatch.setenv("PWRITER_STRIPE_SIZE", "huge")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid setting stripe_size='huge' (from PWRITER_STRIPE_SIZE): ")
    # An explicit value replaces the variable, and so does its blame.
    with pytest.raises(ConfigError) as caught:
        load_settings(stripe_size="4XB")
    assert "(from" not in str(caught.value)
