// The test host page (tests/test_ui.py): embeds the job view the way MCP hosts do, with the ext-apps AppBridge
// and an MCP client of the server. Built by the test into a temporary folder (--outDir); never shipped.
import { fileURLToPath } from "node:url";

import { defineConfig } from "vite";
import { viteSingleFile } from "vite-plugin-singlefile";

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  logLevel: "warn",
  plugins: [viteSingleFile()],
  build: {
    outDir: fileURLToPath(new URL("../../build/ui-test-host", import.meta.url)),
    emptyOutDir: true,
    target: "es2022",
    reportCompressedSize: false,
  },
});
