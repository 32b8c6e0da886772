from infrastructure.settings import Settings


def test_settings_fixture_gives_isolated_store(settings: Settings, backend: str) -> None:
    assert settings.backend == backend
    if backend == "postgres":
        assert settings.postgres is not None and settings.postgres.schema.startswith("t_")
