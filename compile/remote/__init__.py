"""Where models come from and go to: the Hub, S3, the fetch and push stages and their manifest."""
