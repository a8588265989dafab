from castbook.cli import main

raise SystemExit(main())
