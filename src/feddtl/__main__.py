from feddtl.cli import main

raise SystemExit(main())
