"""Applications over the whole chain: commands that run other packages' commands (the demo), registered like every
package's commands (entry-point group ``difffeat.commands``). Nothing below imports this package."""
