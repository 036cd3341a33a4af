"""Stand-ins for codebases users bring: written in their style, independent of disback."""
