"""The email sender: claims email notifications and delivers them over SMTP."""
