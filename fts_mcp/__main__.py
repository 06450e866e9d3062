from fts_mcp.cli import main

raise SystemExit(main())
