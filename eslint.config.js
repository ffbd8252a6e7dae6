// Lint: ESLint's and typescript-eslint's recommended rules; layout is prettier's (npm run lint runs both).
import js from '@eslint/js';
import { defineConfig } from 'eslint/config';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default defineConfig(
  { ignores: ['node_modules/', '.healthetl/', 'coverage/', 'bench-results/'] },
  js.configs.recommended,
  tseslint.configs.recommended,
  { languageOptions: { globals: globals.node } },
  {
    rules: {
      // `const { a: _a, ...rest } = x` is how a key is left out of a copy.
      '@typescript-eslint/no-unused-vars': ['error', { ignoreRestSiblings: true }],
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // The rows of a test's own SQL are `any` on purpose: the assertion that follows states
      // the shape it expects, and a type for every ad-hoc query would only repeat it.
      '@typescript-eslint/no-explicit-any': 'off',
    },
  },
);
