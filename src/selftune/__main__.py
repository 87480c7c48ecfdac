from selftune.cli import entry

entry()
