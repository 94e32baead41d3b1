from kvfleet.cli import main

raise SystemExit(main())
