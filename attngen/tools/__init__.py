"""The command-line tools: build / check / verify / tune / report / show."""
