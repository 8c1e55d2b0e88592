from pathlib import Path

from pneumoscan.config import PROJECT_ROOT, DataConfig, portable_path, to_jsonable


def test_paths_in_shared_records_are_relative_to_the_project() -> None:
    beside = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray"
    assert portable_path(beside) == str(Path("..") / "shared" / "data" / "chest_xray")
    assert portable_path(Path("runs") / "v1") == str(Path("runs") / "v1")
    record = to_jsonable(DataConfig(root=beside))
    assert not any(str(value).startswith(str(PROJECT_ROOT.parent)) for value in record.values())
