from governor.cli import main

main()
