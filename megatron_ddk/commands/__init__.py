"""The tool subcommands of `megatron-ddk` (cli.TOOLS): one module each, with its own parser and
`main(argv) -> int`. A ValueError ends a command with one `error:` line and exit code 2
(console.run_command, called by cli.run_tool). tools/*.py in a checkout wrap the same modules."""
