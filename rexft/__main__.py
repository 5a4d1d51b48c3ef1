from rexft.cli import entry

entry()
