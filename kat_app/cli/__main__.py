from kat_app.cli import main

main()
