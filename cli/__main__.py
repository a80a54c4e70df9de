from infer.cli.main import main

main()
