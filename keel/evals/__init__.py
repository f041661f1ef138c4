"""`keel eval`: how far two models' (or two servers') answers drift apart on a suite of chats."""
