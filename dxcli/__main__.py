from dxcli.cli.main import run

run()
