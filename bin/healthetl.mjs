#!/usr/bin/env node
// The CLI is TypeScript run through tsx, so there is no build step to forget.
import { register } from 'tsx/esm/api';
register();
const { main } = await import('../scripts/cli.ts');
await main(process.argv.slice(2));
