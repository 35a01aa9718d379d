"""End-to-end tests of chronosd: a real daemon process, real sockets, real Unix users."""
