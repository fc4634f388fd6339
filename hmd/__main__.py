from hmd.cli import main

raise SystemExit(main())
