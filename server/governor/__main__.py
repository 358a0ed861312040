from governor.cli.main import main

main()
