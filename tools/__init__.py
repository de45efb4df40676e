"""Developer tools: regenerating the bundled toy model family and measuring its merge effect."""
