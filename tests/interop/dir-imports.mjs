// @anycable/serverless-js publishes ESM that imports directories ('./rpc'), as bundlers
// allow and plain Node does not (ERR_UNSUPPORTED_DIR_IMPORT).  This resolve hook retries such a
// relative import as '<dir>/index.js', then '<file>.js'.  Usage: node --import ./dir-imports.mjs
import { register } from 'node:module'

register('./dir-imports-hook.mjs', import.meta.url)
